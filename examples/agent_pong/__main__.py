"""`python -m examples.agent_pong start` (run from the repository root)."""

from examples.agent_pong.worker import main

if __name__ == "__main__":
    main()
