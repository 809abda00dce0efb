terraform {
  # 1.5: optional() object attributes with defaults, lifecycle preconditions, check blocks.
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.30, < 7"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ Application = "alerting-app", Name = var.name }, var.tags)
  }
}
