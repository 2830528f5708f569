import QuantLab
print("qlab placeholder")
