

c6:api