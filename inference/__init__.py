"""The inference host's side: versions of the service under a process supervisor, one reverse
proxy in front, and rollouts with checks, a canary and rollback (issue 11; README: Two machines).

Plain Python: no Prefect (flows/deploy.py and flows/rollback.py wrap it), and nothing of the
training stack (no torch, DVC or Great Expectations) is imported on this path.
"""
