"""Test-session settings.

JAX's persistent compilation cache stays off in the test process: the engine turns it on for users
(polar_jax/engine/llm_engine.py), and once on it is process-wide, so every later test would read and
write executables in the user's cache folder. A full run here once died in a segmentation fault while
deserialising such an entry; tests must not depend on what other processes left on disk. Servers and CLI
runs that tests start as subprocesses keep the engine's default.
"""

import jax

jax.config.update("jax_enable_compilation_cache", False)
