"""Training GR-1 (Main.py is the entry point): trainer.py runs the loop, schedule.py decides when things happen,
step.py does one batch's work, logs.py reports, state.py saves and resumes the full training state."""
