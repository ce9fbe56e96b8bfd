"""The command line: `selfie <verb>`, one module per verb, kept apart from the library it calls.

Importing it quietens what third-party libraries print as they import, unless -v / --verbose is on the command line:
bitsandbytes' line about kernels it cannot fetch, DeepSpeed's accelerator notice, the deprecation warnings of the
libraries selfie drives (each about a name selfie passes on their behalf) and transformers' "[INFO] Running in WANDB
offline mode". The first thing a user reads is then selfie's own.
"""

import contextlib
import io
import logging
import sys
import warnings

VERBOSE = bool({"-v", "--verbose"} & set(sys.argv[1:]))

if not VERBOSE:
    for name in ("bitsandbytes", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|torch|trl|peft|accelerate|deepspeed)(\.|$)")
    with contextlib.redirect_stdout(io.StringIO()):
        import transformers.integrations.integration_utils  # noqa: F401 - its import prints to stdout
