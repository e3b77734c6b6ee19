"""What every experiment's report writer shares: the hand-written notes kept across reruns."""

import os

NOTES = "<!-- notes -->"


def kept_notes(path: str) -> str:
    """The hand-written part of an existing .md: from the NOTES line on, or ''.

    A report writer appends this to the table it regenerates, so reading notes written under
    NOTES survive a rerun of the experiment.
    """
    if not os.path.isfile(path):
        return ""
    with open(path) as file:
        text = file.read()
    return text[text.index(NOTES) :] if NOTES in text else ""
