"""The engine: the model's forwards, the queue policy and the decode loop, behind one client.

``protocol`` (the typed work items and messages), ``plan`` (the scheduling policy, a pure
function), ``core`` (:class:`~server.engine.core.EngineCore` and its thread), ``client``
(:class:`~server.engine.client.EngineClient`, in this process or in its own) and ``proc`` (the
engine process's main).
"""
