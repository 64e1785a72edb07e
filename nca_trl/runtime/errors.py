"""Errors in what the user asked for, told as one line.

A `SettingsError` is a setting (a flag, a recipe key, a value, an output folder that holds another run) refused
before anything is written or loaded. The command line prints its message alone, `nca-trl CMD: error: MESSAGE`, and
exits 2, as argparse does for an unknown flag: the message names the setting and the fix, and a traceback through the
parser would only hide it. From Python it is a `ValueError` like any other.
"""

from __future__ import annotations

import functools

__all__ = ["ROW_INDEX", "DataError", "OutputDirError", "SettingsError", "settings_errors"]

#: Column the trainers (and `nca-trl train`, before it converts or splits the data) add to a given dataset: each row's
#: position in it, so that errors (a bad row, a non-finite step) name the user's rows. A private name, so that a column
#: of the user's own (a `row_index` of ids) is neither taken for it nor changed. Here, below the data package and the
#: run safety that both use it.
ROW_INDEX = "_nca_row_index"


class SettingsError(ValueError):
    """A setting refused before anything is written or loaded (its message names the setting and the fix)."""


class DataError(ValueError):
    """The base of a bad data row (`nca_trl.data.DataValidationError`: dataset, row, field, fix) and a data file that
    cannot be loaded (`nca_trl.data.datafiles.DataFileError`: file, line, fix); `nca-trl generate`'s and
    `nca-trl score`'s bad rows raise it too. The command line prints the message alone, exit 2, as a `SettingsError`'s:
    it names the row or line and the fix. The commands meet them before writing what they make (`nca-trl train`
    validates every row before any model loads: it does not stream; `nca-trl score` checks each scored row before
    it writes the file), and a failed command's output folder that it created is removed again."""



class OutputDirError(OSError):
    """`output_dir` cannot be written (a file, a folder not writable): found before anything loads
    (`nca_trl.runtime.output_dir.check_output_dir`). The command line prints it as a `SettingsError`: one line, exit
    2."""

    def __str__(self) -> str:  # the message, without OSError's "[Errno 20] " in front
        return self.strerror or super().__str__()

def settings_errors(parse):
    """Decorate a command's argument parser: every `ValueError` it raises becomes a `SettingsError` (same message,
    the original chained as its cause)."""

    @functools.wraps(parse)
    def wrapper(*args, **kwargs):
        try:
            return parse(*args, **kwargs)
        except SettingsError:
            raise
        except ValueError as error:
            raise SettingsError(str(error)) from error

    return wrapper
