
e1*
defaultweb