"""The paper's math as pure functions (METHOD.md §1, §3–§6): noise, preconditioning, curricula, losses, samplers."""
