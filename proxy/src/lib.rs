//! weft proxy: the kube-proxy replacement (see the modules).
