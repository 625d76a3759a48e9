"""The service's own types, independent of any wire protocol, adapter or protobuf: the chat
events and turns (`events`) and the pool of minted sessions (`session_pool`)."""
