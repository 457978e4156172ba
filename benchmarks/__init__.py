"""The benchmarks (each writes JSON + PNG). Like the CLI, they drop the two third-party notices that every run
would otherwise print (`hmt_adapter_cli.quiet`), before any of them imports peft."""

from hmt_adapter_cli.quiet import silence_third_party_notices

silence_third_party_notices()
