"""The user's side: the `ohd` commands, the socket client, the script API and the demo."""
