"""Models and what is done with them: building, the input loader, training and its random transforms,
box supervision, calibration, evaluation, comparison, the champion alias, export and the model card.
Imports only core and data."""
