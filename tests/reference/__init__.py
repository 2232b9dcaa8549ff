"""Re-statements of the official code (starxing-yuu/SSN), written for this project's fidelity tests."""
