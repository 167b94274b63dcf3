"""``python -m sglang_worker``: one inference engine behind the ``sglang.v1.Worker`` gRPC service.

Thin by design: settings (:mod:`.args`) -> wire up (:mod:`.main`) -> serve (:mod:`.servicer`) ->
drain on SIGTERM. Registration and KV events go to Redis (:mod:`.heartbeat`,
``sglang.cluster.kv_events``).
"""
