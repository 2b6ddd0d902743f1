

c4*api