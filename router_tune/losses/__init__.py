"""Training objectives shared by training and evaluation: Switch load balancing and router z-loss
(`balancing`), and the next-token cross-entropy through a frozen head, chunk by chunk (`lm_loss`).
Imports: errors, data (IGNORE_INDEX).
"""
