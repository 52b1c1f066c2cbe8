"""The pure consensus engine (SPEC §8): rounds, results and Byzantine detection.

`Engine` is a synchronous state machine: no I/O, no Trio, no clock reads. Each call
takes `now` and returns events (`events.py`) for the node service to act on.
"""

from .engine import ALL_HELD as ALL_HELD
from .engine import COMPLETE as COMPLETE
from .engine import FAILED as FAILED
from .engine import PENDING as PENDING
from .engine import Engine as Engine
from .engine import EngineConfig as EngineConfig
from .engine import RoundView as RoundView
from .engine import consensus_result as consensus_result
from .events import CONFLICTING_OBSERVATIONS as CONFLICTING_OBSERVATIONS
from .events import EXCESSIVE_DEVIATION as EXCESSIVE_DEVIATION
from .events import Accepted as Accepted
from .events import ByzantineCleared as ByzantineCleared
from .events import ByzantineDetected as ByzantineDetected
from .events import ByzantineRecord as ByzantineRecord
from .events import ConflictDetected as ConflictDetected
from .events import Duplicate as Duplicate
from .events import Event as Event
from .events import InvalidEvidence as InvalidEvidence
from .events import NotAValidator as NotAValidator
from .events import ResultChanged as ResultChanged
from .events import RoundCompleted as RoundCompleted
from .events import RoundFailed as RoundFailed
from .events import RoundOpened as RoundOpened
from .events import RoundPruned as RoundPruned
from .events import RoundResult as RoundResult
from .events import RoundTooOld as RoundTooOld
