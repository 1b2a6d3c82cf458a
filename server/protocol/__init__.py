"""Wire types, one module per API family: ``v4`` (the hosted contract).

Every layer may import these; they import nothing of the server. The HTTP layer validates
request bodies with them and the service shapes responses with them, the split vLLM uses
between ``protocol.py`` and ``serving.py``.
"""
