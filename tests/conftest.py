import sys
from pathlib import Path

# Test helpers (stand-ins for flash_attn/vllm, host-args capture, the DeepSpeed rank worker).
sys.path.insert(0, str(Path(__file__).parent / "support"))
