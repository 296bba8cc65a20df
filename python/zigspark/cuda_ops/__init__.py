"""Python side of the CUDA extension: allocation is done by the caller, these functions translate
tensors into the raw pointers, strides, dtype code, device and stream that ``zigspark._C`` takes."""
