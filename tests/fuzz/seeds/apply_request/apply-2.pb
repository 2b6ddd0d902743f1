

c2
webapi