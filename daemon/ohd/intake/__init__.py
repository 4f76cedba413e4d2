"""How work arrives: tasks.d/ files, the working-tree and tasks.d watches, the hooks' spool,
standing rules and their schedules.
"""
