"""eigenwatch: streaming spectral monitoring of hidden activations inside vLLM.

The code lives in the card's folders and is mapped here by setup.py:
``eigenwatch.kernels`` (kernels/), ``eigenwatch.hooks`` (hooks/),
``eigenwatch.monitor`` (monitor/); ``eigenwatch.v1`` holds the gRPC stubs
generated from proto/ at build time.
"""

__version__ = "0.1.0"
