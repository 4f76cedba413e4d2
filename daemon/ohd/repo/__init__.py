"""A user's repository: safe writes inside it (outputs) and git (gitrepo)."""
