"""An offline Hugging Face Hub for the tests (repos.py: what it holds; server.py: how it answers).
tests/hub/test_hub_emulator.py proves it faithful with the real huggingface_hub client."""

from tests.support.hub.repos import Hub, Repo, git_blob_oid
from tests.support.hub.server import HubEmulator, running_hub

__all__ = ["Hub", "HubEmulator", "Repo", "git_blob_oid", "running_hub"]
