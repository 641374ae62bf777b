"""What the chapters show, read from the results store only: tables, figures, the paper's numbers
next to ours, the live controls of an interactive chapter, and the book built from the chapters."""
