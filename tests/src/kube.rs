//! Real etcd + apiextensions-apiserver for tests.
