"""Example models that `make demo` trains or builds and registers, so the pipeline has something real to run on."""
