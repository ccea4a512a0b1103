"""``bridge serve``: the OpenAI-compatible server over one ``Engine``.

``app`` is the FastAPI app and its running; ``worker`` runs every llama.cpp call on one
thread, one request at a time; ``openai_api`` holds the API's shapes (requests validated
into bridge's settings, responses, stream chunks). FastAPI, sse-starlette and uvicorn come
with the ``serve`` extra.
"""
