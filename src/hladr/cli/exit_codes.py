"""The exit codes of the ``hladr`` command (the one place they are defined).

====  ========================================================================
code  meaning
====  ========================================================================
0     ``analyze``: the result is reportable (warnings or not);
      ``batch``: every patient tube gave a reportable result; other commands: done
1     an error: the file, folder or value named on stderr is unusable
2     usage: invalid arguments (argparse), or a batch that cannot start
3     ``analyze``: the result is not reportable (QC failed: no class is given);
      ``batch``: some tube is not reportable or failed; ``beads-qc``: a Westgard rule is violated
70    an internal error (a bug: please report it)
130   interrupted; 141: stdout closed by the reader (``| head``)
====  ========================================================================

Warnings alone never change an exit code.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_REPORTABLE = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
