"""The draft sources, each behind ``runtime.drafting.Drafter``'s one method, so the decode
loop never knows where drafts come from:

- ``lookup``: the last few tokens found earlier in the context propose what followed;
- ``memory``: the same over earlier requests (a server's drafting memory);
- ``pruned``: a layer-pruned GGUF of the model in its own llama.cpp context;
- ``grammar``: the text a constraint forces (``runtime.constraint``).

``sources`` says which of them an engine's lanes get, and builds one lane's drafters.
"""
