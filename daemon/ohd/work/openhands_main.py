"""The OpenHands runner's entry: one OpenHands SDK agent run in a workspace, pointed at ohd's proxy.

Standalone: run by path with the interpreter `[agents] openhands_python` names (one that has
`openhands-sdk` and `openhands-tools`), never imported by ohd, and importing nothing of ohd. It
follows the SDK's documented hello world: an `LLM` on an OpenAI-compatible server (ohd's local
proxy, the per-run token from the variable `--api-key-env` names), the preset default agent, a
`Conversation` whose workspace is the run's worktree, the prompt file sent as the message, run to
its end. Exit 0 when the conversation finished; 3 when the SDK is not installed (the message names
the packages and the setting).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ohd-openhands")
    parser.add_argument("--prompt-file", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key-env", required=True)
    parser.add_argument("--workspace", required=True)
    args = parser.parse_args(argv)
    try:
        from openhands.sdk import LLM, Conversation  # type: ignore[import-not-found, unused-ignore]
        from openhands.tools.preset.default import get_default_agent  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        print(f"ohd: the OpenHands SDK is not installed for {sys.executable} ({exc}); install openhands-sdk and "
              "openhands-tools there, or set [agents] openhands_python to an interpreter that has them",
              file=sys.stderr)
        return 3
    llm = LLM(model="openai/" + args.model, base_url=args.base_url, api_key=os.environ[args.api_key_env])
    agent = get_default_agent(llm=llm, cli_mode=True)
    conversation = Conversation(agent=agent, workspace=args.workspace)
    conversation.send_message(args.prompt_file.read_text(encoding="utf-8"))
    conversation.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
