"""The paper's math as pure functions (method.md §1, §3–§6): noise, preconditioning, curricula, losses, samplers."""
