
e1"]
[*Y
-
defaultcanary:split.smi-spec.io/v1alpha1website

website-v1„

website-v2d