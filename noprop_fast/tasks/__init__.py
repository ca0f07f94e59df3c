"""The two tasks a run trains (loop.py runs both): each supplies the model, the batches of a
round, the loss of a batch, the evaluation, the summary's fields and the printed lines."""
from .image import ImageTask
from .language import LanguageTask

TASKS = {"image": ImageTask, "lm": LanguageTask}
