"""The shape packages are copied into tmp repos by tests.support.projects; their own tests
run there, under the copy's pytest, never as part of ohd's suite."""

collect_ignore_glob = ["*"]
