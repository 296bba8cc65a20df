"""Models built on zigspark's ops: the ZigMa generator (image and video) and its named sizes."""

from .configs import zigma_config
from .recognizer import Recognizer
from .zigma import ZigMa, ZigMaVideo
