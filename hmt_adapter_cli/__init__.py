"""The `hmt-adapter` command line: `train`, `eval` and the offline `demo`.

Kept apart from the `hmt_adapter` library, which never prints, plots or picks threads/devices: everything that
talks to a terminal or writes a plot lives here.
"""
