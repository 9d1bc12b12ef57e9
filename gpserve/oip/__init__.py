"""The Open Inference Protocol (KServe v2), beside GraphPipe on the same fronts: its
datatypes, its HTTP codec and routes. docs/open-inference-protocol.md."""
