
@
c1:

webapi$
"/metrics"GET*
x-canary1"l7