"""The operator's decisions as pure functions: what a FleetJob's shards need next, given what the API holds.

``plan`` (``shards.py``) is the heart: from the job, its shard pods, the ledger of settled shards, the cars' trust
records and the time it returns the pods to create and delete, the ledger entries to write, the trust verdicts,
the Events a user should see, the status to write and when to look again. ``podspec`` builds a shard pod from the
one shard contract; ``reasons`` tells a departure (the car drove off: free, resume elsewhere) from a failure of the
shard itself (counts against ``retries``); ``status`` turns counts into conditions and a phase.

Nothing here does I/O, reads the clock or logs: the job controller gathers the inputs and carries out the plan.
"""
