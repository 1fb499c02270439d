"""dinolab's reports: MLflow runs -> tidy DataFrame -> ablation tables and plots (to come)."""
