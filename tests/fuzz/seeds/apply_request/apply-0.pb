
1
c0+

webapi"consul-smi: default/web