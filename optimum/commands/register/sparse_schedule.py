"""``optimum-cli sparse-schedule {compress,eval,push} ...``: the ``optimum-sparsesched`` commands under optimum's CLI.

optimum (2.x) imports every module of the namespace package ``optimum.commands.register`` when ``optimum-cli``
starts and registers the commands listed in its ``REGISTER_COMMANDS``. This module stays light (only optimum's
base classes): torch, transformers and ``optimum_sparsesched`` are imported when the command runs.
"""

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

COMMANDS = ("compress", "eval", "push")


class SparseScheduleCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="sparse-schedule", help="SparseGPT pruning with layer-wise sparsity schedules "
                          "(optimum-sparsesched): compress, eval, push")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.description = ("SparseGPT compression with layer-wise sparsity schedules. Run "
                              "`optimum-cli sparse-schedule COMMAND --help` for the options of a command.")
        parser.add_argument("command", choices=COMMANDS, help="compress: compress a model (the embedded "
                            "SmolLM2-135M without MODEL) and save it with -o OUT; eval: perplexity on a text and "
                            "lm-eval accuracies (--tasks); push: upload a saved compressed checkpoint to the Hub")
        parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's arguments and options")

    def run(self) -> None:
        from optimum_sparsesched.cli import main

        sys.exit(main([self.args.command, *self.args.arguments], prog="optimum-cli sparse-schedule"))


REGISTER_COMMANDS = [SparseScheduleCommand]
