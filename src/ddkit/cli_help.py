"""Help texts shared by the ``ddkit`` command line and its ``bench`` command."""

COMPILE_HELP = ("{what} through torch.compile: about 1.5x to 1.7x faster per step on a CPU after "
                "a first step that compiles (half a minute or so per batch shape); the same computation, with "
                "other float rounding; needs a C++ compiler on a CPU, Triton on a GPU")
