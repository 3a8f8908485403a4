"""Domain discovery for c-BTM: tf-idf -> SVD -> balanced k-means, and routing by cluster distance."""
