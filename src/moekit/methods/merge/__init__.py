"""Expert merging as pure functions: grouping, neuron alignment, averaging, router rows."""
