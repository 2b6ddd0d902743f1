
e1"`
^*\
-
defaultcanary:split.smi-spec.io/v1alpha2website

website-v1І

website-v2І