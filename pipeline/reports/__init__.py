"""Reports a researcher can read: figures and tables made from the pipeline's outputs.

:mod:`pipeline.reports.qualitative` draws the thesis's qualitative figures (4.9-4.13),
each as a PNG with the numbers behind it in a CSV beside it.
"""
