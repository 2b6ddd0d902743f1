

c52
apihttp